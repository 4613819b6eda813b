//go:build tools

// Package tools pins upstream's controller command so `go mod tidy` keeps every dependency of
// the packages main.go uses (requiring only the module leaves go.sum incomplete).
package main

import _ "github.com/shipwright-io/build/cmd/shipwright-build-controller"
