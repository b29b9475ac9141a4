"""pipeline-console consume: broker messages into the pipeline (RabbitMQ, NATS JetStream),
each acknowledged only after the transaction holding its decision has committed."""
