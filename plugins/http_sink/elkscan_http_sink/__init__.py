"""elkscan's HTTP sink: records POSTed in batches to an HTTP endpoint, Elasticsearch or Splunk HEC."""
