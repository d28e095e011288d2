"""fedseg's Flower strategies (Message API) and the registry that finds them by name."""
