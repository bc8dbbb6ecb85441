"""Running fedtune across machines: certificates and site keys, the coordinator (a Flower
SuperLink) and the site agent (a Flower SuperNode)."""
