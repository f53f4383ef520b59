
target "default" {
	cache-to = ["type=gha,mode=min,scope=integration-tests"]
}
