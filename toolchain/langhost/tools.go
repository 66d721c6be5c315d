//go:build tools

// Package toolchain pins the Python language host.
package toolchain

import (
	_ "github.com/pulumi/pulumi/sdk/v3/python/cmd/pulumi-language-python"
)
