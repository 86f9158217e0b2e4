"""Expert providers: fully resident, and offloading (store -> cache -> prefetcher)."""
