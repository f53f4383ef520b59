
target "default" {
	dockerfile-inline = <<EOT
ARG VERSION=latest
FROM alpine:$${VERSION}
EOT
	args = {
		VERSION = "3.21"
	}
	annotations = [
		"org.opencontainers.image.authors=$${user}"
	]
	labels = {
		foo = "hello %%{bar}"
	}
}
