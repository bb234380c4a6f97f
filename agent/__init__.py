"""simswarm-agent: fills a Hugging Face cache from MinIO/S3, proves it correct, and launches vLLM."""

__version__ = "0.1.0"
