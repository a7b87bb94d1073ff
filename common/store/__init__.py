"""Where credentials are kept: the store protocols, the token directory (files, lock, story-file
mirrors), the Redis/Valkey backend, the choice between them and the host's clock offset."""
