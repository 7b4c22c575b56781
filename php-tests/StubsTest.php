<?php

declare(strict_types=1);

use PHPUnit\Framework\TestCase;

/** stubs/amqp_rs.stub.php must say exactly what the loaded extension declares. */
final class StubsTest extends TestCase
{
    private const STUB = __DIR__ . '/../stubs/amqp_rs.stub.php';

    /** Reflection of every AmqpRs class, as a comparable array; runs in both processes. */
    public const DESCRIBE = <<<'PHP'
        function amqp_rs_describe(array $classes): array {
            $out = [];
            foreach ($classes as $name) {
                $c = new ReflectionClass($name);
                $methods = [];
                foreach ($c->getMethods() as $m) {
                    if ($m->getDeclaringClass()->getName() !== $c->getName()) {
                        continue;
                    }
                    $params = [];
                    foreach ($m->getParameters() as $p) {
                        $params[] = [
                            'name' => $p->getName(),
                            'type' => (string) $p->getType(),
                            'optional' => $p->isOptional(),
                            'default' => $p->isDefaultValueAvailable() ? var_export($p->getDefaultValue(), true) : null,
                            'by_ref' => $p->isPassedByReference(),
                        ];
                    }
                    $methods[$m->getName()] = [
                        'static' => $m->isStatic(),
                        'visibility' => $m->isPublic() ? 'public' : ($m->isProtected() ? 'protected' : 'private'),
                        'params' => $params,
                        'return' => (string) $m->getReturnType(),
                    ];
                }
                ksort($methods);
                $out[$name] = [
                    'final' => $c->isFinal(),
                    'parent' => $c->getParentClass() ? $c->getParentClass()->getName() : null,
                    'interfaces' => array_values(array_diff($c->getInterfaceNames(), ['Stringable', 'Throwable'])),
                    'methods' => $methods,
                ];
            }
            ksort($out);
            return $out;
        }
        PHP;

    private function stubClasses(): array
    {
        preg_match_all('/^(?:final\s+)?class\s+(\w+)/m', (string) file_get_contents(self::STUB), $m);
        return array_map(fn ($c) => "AmqpRs\\$c", $m[1]);
    }

    public function testEveryExtensionClassIsInTheStubs(): void
    {
        $extension = (new ReflectionExtension('amqp_rs'))->getClassNames();
        sort($extension);
        $stubs = $this->stubClasses();
        sort($stubs);
        $this->assertSame($extension, $stubs);
    }

    public function testStubsMatchReflectionOfTheLoadedExtension(): void
    {
        eval(self::DESCRIBE);
        $live = amqp_rs_describe($this->stubClasses());

        // The stubs, loaded in a PHP without the extension, described the same way.
        $script = tempnam(sys_get_temp_dir(), 'stubs');
        file_put_contents($script, "<?php\n" . self::DESCRIBE . "\nrequire " . var_export(realpath(self::STUB), true) . ";\n"
            . 'echo json_encode(amqp_rs_describe(' . var_export($this->stubClasses(), true) . '));');
        exec(PHP_BINARY . ' -n ' . escapeshellarg($script) . ' 2>&1', $out, $code);
        unlink($script);
        $this->assertSame(0, $code, implode("\n", $out));
        $fromStubs = json_decode(implode("\n", $out), true, 512, JSON_THROW_ON_ERROR);

        $this->assertSame(json_decode(json_encode($live), true), $fromStubs);
    }
}
