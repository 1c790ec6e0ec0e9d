"""What every HTTP service shares: waitress setup, where it listens, credentials and Go-shaped JSON errors."""
