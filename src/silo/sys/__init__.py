"""silo.sys"""
