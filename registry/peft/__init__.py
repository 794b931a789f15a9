"""Built-in PEFT methods, one file each. See docs/peft.md."""
