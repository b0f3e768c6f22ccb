"""elkscan's NATS plugin: the ``nats`` sink (records into a JetStream stream)."""
