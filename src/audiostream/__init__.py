"""audiostream: real-time audio processing over WebSockets, RabbitMQ and ONNX Runtime."""

__version__ = "0.1.0"
