"""Model output formats that do not fit chat_output.py's marker parsers, one module each."""
