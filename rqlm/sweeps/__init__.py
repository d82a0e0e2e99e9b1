"""`rqlm sweep`: train and evaluate a grid of recipes from a YAML file, with its table and plots (`runner`)."""
