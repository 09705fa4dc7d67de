"""AUTOMATIC1111's HTTP API (/sdapi/v1): its request schemas, their mapping to ours, the routes."""
