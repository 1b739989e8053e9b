package proxy

import (
	"errors"
	"fmt"

	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/proto" // registers the proto codec the fallback uses
	"google.golang.org/grpc/mem"
)

// Frame is one gRPC message as it came off the wire: its bytes are kept
// (zero-copy, in grpc's pooled buffers) and never decoded.
//
// Ownership: after Unmarshal the Frame holds one reference to the buffers.
// Marshal hands that reference to grpc's transport, which frees it once the
// message is written. Whoever holds a Frame that was not (or not
// successfully) handed to Marshal calls Free; Free after Marshal is a no-op.
type Frame struct {
	data mem.BufferSlice
	sent bool
}

// Len is the message size in bytes.
func (f *Frame) Len() int { return f.data.Len() }

// Free releases the Frame's reference to its buffers, if it still has one.
func (f *Frame) Free() {
	f.data.Free()
	f.data = nil
}

// errFrameResent guards against marshalling one received Frame twice: its
// reference was given away the first time, so a second send would be empty.
var errFrameResent = errors.New("proxy: frame marshalled twice")

// codec is an encoding.CodecV2 that passes *Frame through untouched and
// delegates every other message type (the proxy's own health service) to
// grpc's proto codec. It is installed per server (grpc.ForceServerCodecV2)
// and per call (grpc.ForceCodecV2), never registered globally, so nothing
// else in the process is affected.
type codec struct {
	fallback encoding.CodecV2
}

var _ encoding.CodecV2 = (*codec)(nil)

// NewCodec returns the pass-through codec. Its name is "proto": the content
// type upstream stays application/grpc+proto, as the bytes are protobuf.
func NewCodec() (encoding.CodecV2, error) {
	fb := encoding.GetCodecV2("proto")
	if fb == nil {
		return nil, errors.New("proxy: grpc proto codec is not registered")
	}
	return &codec{fallback: fb}, nil
}

func (c *codec) Name() string { return "proto" }

// Marshal returns the Frame's buffers and gives their reference to the
// caller (grpc frees it after writing).
func (c *codec) Marshal(v any) (mem.BufferSlice, error) {
	f, ok := v.(*Frame)
	if !ok {
		return c.fallback.Marshal(v)
	}
	if f == nil {
		return nil, fmt.Errorf("proxy: marshal nil *Frame")
	}
	if f.sent {
		return nil, errFrameResent
	}
	out := f.data
	f.data, f.sent = nil, true
	return out, nil
}

// Unmarshal keeps the received buffers in the Frame. grpc frees its own
// reference when Unmarshal returns, so the Frame takes one of its own.
func (c *codec) Unmarshal(data mem.BufferSlice, v any) error {
	f, ok := v.(*Frame)
	if !ok {
		return c.fallback.Unmarshal(data, v)
	}
	if f == nil {
		return fmt.Errorf("proxy: unmarshal into nil *Frame")
	}
	data.Ref()
	f.Free() // a reused Frame drops what it held before
	f.data, f.sent = data, false
	return nil
}
