"""One module per architecture; the registry imports them lazily."""
