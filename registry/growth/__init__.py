"""Built-in growth operators, one file each. See docs/growth.md."""
