"""silo.engine"""
