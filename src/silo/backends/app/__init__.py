"""silo.backends.app"""
