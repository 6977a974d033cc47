"""What the stages share: configs, the data reader, run directories, metrics."""
