"""Open Inference Protocol (V2) adapters: REST (`rest`, `codec`) and gRPC (`grpc_server`, `grpc_codec`, and `h2_server`, the lean HTTP/2 server it runs on by default)."""

SERVER_NAME = "bento-canary"
SERVER_VERSION = "0.1.0"
# Extensions answered at /v2 and by ServerMetadata.
SERVER_EXTENSIONS = ("binary_tensor_data",)
