"""silo.backends"""
