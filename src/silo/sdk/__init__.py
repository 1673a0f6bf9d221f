"""silo.sdk"""
