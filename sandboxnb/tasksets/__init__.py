"""Built-in tasksets."""
