"""The hubwire connection service: hubs hosted for apps that keep no connections themselves."""
