"""The web page at `/`: what the mirror holds and what it saved, rendered on the server."""
