"""silo.backends.process"""
