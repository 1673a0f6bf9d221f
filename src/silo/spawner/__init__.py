"""silo.spawner"""
