"""silo.cli"""
