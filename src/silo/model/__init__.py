"""silo.model"""
