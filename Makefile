# amqp_rs: `make` builds the extension, `make test` runs every suite, `make demo` shows it work.
export PATH := $(HOME)/.cargo/bin:$(PATH)

SO        := target/release/libamqp_rs.so
PHP       ?= php
PHP_EXT   := $(PHP) -d extension=$(CURDIR)/$(SO)
SOURCES   := Cargo.toml Cargo.lock build.rs $(shell find src -name '*.rs')

.PHONY: all build deps broker install test test-rust test-php lint demo clean

all: build

build: $(SO)

$(SO): $(SOURCES)
	cargo build --release
	@touch $@

deps:
	@scripts/setup.sh

broker:
	@scripts/broker.sh

install: $(SO)
	install -m 0644 $(SO) "$$(php-config --extension-dir)/amqp_rs.so"
	for dir in /etc/php/*/cli/conf.d /etc/php/*/fpm/conf.d; do \
	  [ -d "$$dir" ] && echo "extension=amqp_rs.so" > "$$dir/30-amqp_rs.ini" || true; \
	done
	@echo "installed: php --ri amqp_rs"

lint:
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings

test-rust: broker
	cargo test

test-php: broker $(SO)
	$(PHP_EXT) /usr/bin/phpunit -c php-tests/phpunit.xml

test: deps broker
	$(MAKE) build
	$(MAKE) lint
	$(MAKE) test-rust
	$(MAKE) test-php

demo: deps broker
	$(MAKE) build
	$(PHP_EXT) examples/demo.php

clean:
	cargo clean
