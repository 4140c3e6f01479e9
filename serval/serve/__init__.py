"""`serval serve` and `serval mcp`: serving a model over HTTP/WebSocket and to agents over MCP.

The HTTP API is small pieces, FastAPI-examples style:

- `config`: `ServerConfig`, every limit and batching setting (one `serval serve` option each);
- `errors`: `ApiError`, the error shape and the app's exception handlers;
- `metrics`: the Prometheus counters and the middleware that feeds them;
- `batching`: `MicroBatcher` (concurrent requests share model calls) and `BatchedPredictor`;
- `service`: `Service`, what handlers read from `app.state.service` (model, limits, admission);
- `uploads`: size-limited bodies, content types, multipart, the duration check from the header;
- `schemas`: response models and the OpenAPI text of errors and upload bodies;
- `routes`: the endpoints, module-level handlers on one `APIRouter`;
- `streaming`: the `WS /v1/stream` protocol;
- `app`: `create_app`, which only assembles the above; `cli`: the `serval serve` command.

`mcp` is the agent tool (`serval mcp`), which shares no code with the HTTP app but the model.
Importing this package imports nothing; each piece imports what it needs.
"""
