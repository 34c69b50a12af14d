"""cola"""
