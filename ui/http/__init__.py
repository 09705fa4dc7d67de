"""The HTTP side of the server: the Host/Origin guard, the login, AUTOMATIC1111's API."""
