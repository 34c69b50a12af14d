"""green"""
