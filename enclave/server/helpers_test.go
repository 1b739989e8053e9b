package server

import (
	"fmt"

	"google.golang.org/grpc/mem"
)

func fmtAny(v any) string { return fmt.Sprint(v) }

// rawMessage is sent as is by rawCodec: it lets a test put arbitrary bytes
// on the wire as a request.
type rawMessage []byte

type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	if b, ok := v.(rawMessage); ok {
		return mem.BufferSlice{mem.SliceBuffer(b)}, nil
	}
	return nil, fmt.Errorf("rawCodec: cannot marshal %T", v)
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	return fmt.Errorf("rawCodec: cannot unmarshal into %T", v)
}

func (rawCodec) Name() string { return "proto" }
