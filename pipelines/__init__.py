"""Shipped pipelines, installed as package data of elkscan-core."""
