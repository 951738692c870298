"""The ``activeguard`` command line: the top floor of the library. Nothing outside this
package imports it.
"""
