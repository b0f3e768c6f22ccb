"""elkscan's file and syslog sinks: records to a log file that rotates, or to syslog."""
