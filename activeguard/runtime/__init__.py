"""Running the servers as child processes that announce their port through a ready file.
No science, no torch: the servers and the demo stand on it.
"""
