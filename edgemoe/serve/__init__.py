"""`edgemoe serve`: one process, one engine, OpenAI's chat-completions API (FastAPI + uvicorn).

    from edgemoe.serve import serve
    serve("bundle/", ServeOptions(port=8080), GenerationOptions(memory_budget="3GB"))

Modules:
  requests.py       request JSON -> ChatRequest (images decoded), or an OpenAI-shaped ApiError
  remote_images.py  http(s) image URLs, fetched with a size limit and a timeout (opt-in)
  worker.py         the thread that owns the ChatSession and answers requests one at a time
  app.py            the routes, authorization, SSE streaming, error bodies
  server.py         load the bundle, warm the engine, run uvicorn, stop cleanly on SIGINT/SIGTERM
Needs the `serve` extra (fastapi, uvicorn); the runtime's import path does not import this package.
"""

from edgemoe.serve.server import ServeOptions, serve

__all__ = ["ServeOptions", "serve"]
