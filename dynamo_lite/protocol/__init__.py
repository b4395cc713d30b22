"""Wire types shared by every process. Imports nothing of the project."""
