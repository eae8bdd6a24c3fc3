"""dictionary"""
