"""The site agent: a Flower ClientApp that fine-tunes the global adapter on the site's private
data with DP-SGD and sends back only the adapter, through secure aggregation.

Installed as ``fedtune.client``; in a Flower App bundle it is the ``client`` component.
"""
