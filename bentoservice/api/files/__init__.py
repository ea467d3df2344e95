"""File routes: upload (checked at once), list, retrieve, content, delete."""
