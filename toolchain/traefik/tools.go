//go:build tools

// Package toolchain pins the Traefik reverse proxy.
package toolchain

import (
	_ "github.com/traefik/traefik/v3/cmd/traefik"
)
