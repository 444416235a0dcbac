"""Necks (pixel decoders): fuse the backbone maps into mask features and decoder inputs."""
