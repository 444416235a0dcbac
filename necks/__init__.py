"""Necks (pixel decoders, detection encoders): fuse the backbone maps into mask features and decoder inputs."""
