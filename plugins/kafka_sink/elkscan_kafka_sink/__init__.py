"""elkscan's Kafka sink: records to a Kafka topic, keyed by record id, through the delivery spool."""
